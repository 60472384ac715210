import sys

from hvtune.cli import main

sys.exit(main())
