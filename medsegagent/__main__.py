import sys

from medsegagent.node.cli import main

sys.exit(main())
