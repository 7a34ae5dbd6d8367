"""GPU report of both kernels (the same as ``grood bench``).

    python bench/gpu_report.py            # on a CUDA machine: accuracy, then the timing tables
    TRITON_INTERPRET=1 python bench/gpu_report.py --tiny --device cpu   # check the script here
"""

import sys

from grood._bench.report import main

if __name__ == "__main__":
    sys.exit(main(prog="gpu_report.py"))
