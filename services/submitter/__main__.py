from services.submitter.service import SubmitterService
from shared.service import main

main(SubmitterService.from_env)
