import sys

from medssl.cli import main

sys.exit(main())
