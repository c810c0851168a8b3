import sys

from cadre.cli import main

sys.exit(main())
