import sys

from xvf.cli import main

sys.exit(main())
