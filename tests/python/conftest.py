import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# The tests import the installed package (make test runs `pip install` first). GRADIVEQ_SOURCE_TREE=1 imports
# python/ in place instead (after `make build`), for a quick edit-and-test loop.
if os.environ.get("GRADIVEQ_SOURCE_TREE") == "1":
    sys.path.insert(0, os.path.join(ROOT, "python"))
# The benchmarks' models and data readers (models, datasets, data) live next to the DDP benchmark scripts.
sys.path.insert(0, os.path.join(ROOT, "benchmarks", "ddp"))
