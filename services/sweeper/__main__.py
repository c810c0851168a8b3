from services.sweeper.service import SweeperService
from shared.service import main

main(SweeperService.from_env)
