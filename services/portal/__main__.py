from services.portal.service import PortalService
from shared.service import main

main(PortalService.from_env, uvloop=True)
