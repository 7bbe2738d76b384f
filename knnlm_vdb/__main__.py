"""``python -m knnlm_vdb`` is the ``knnlm-vdb`` command."""
from knnlm_vdb.cli import main

main()
