from services.registry.service import RegistryService
from shared.service import main

main(RegistryService.from_env)
