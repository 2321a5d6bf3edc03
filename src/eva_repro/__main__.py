import sys

from eva_repro.cli import main

if __name__ == "__main__":
    sys.exit(main())
