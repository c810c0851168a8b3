from services.scheduler.service import SchedulerService
from shared.service import main

main(SchedulerService.from_env)
