import sys

from megatron_gpt.cli import main

sys.exit(main())
