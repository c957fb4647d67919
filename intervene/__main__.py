import sys

from intervene.cli import main

sys.exit(main())
