import sys

from eva_repro.cli import main

sys.exit(main())
