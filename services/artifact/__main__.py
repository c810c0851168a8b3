from services.artifact.service import ArtifactService
from shared.service import main

main(ArtifactService.from_env)
