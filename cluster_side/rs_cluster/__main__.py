from rs_cluster.cli import main
import sys

sys.exit(main())
