import sys

from prima.cli import main

sys.exit(main())
