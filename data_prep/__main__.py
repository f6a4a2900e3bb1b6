import gc
import os
import sys

# data_prep does no linear algebra: without this, the idle threads that OpenBLAS starts
# with numpy take CPU time from the encoding workers
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from data_prep.cli import main  # noqa: E402

code = main()
gc.freeze()  # everything is written and closed: no garbage collection at exit
sys.exit(code)
