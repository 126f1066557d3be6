import os
import shutil
import tempfile
from pathlib import Path

import pytest

from tests.launch.slurm_cluster import SlurmCluster, install_slurm


@pytest.fixture(scope="session")
def slurm_cluster():
    """A Slurm cluster on this host: the one already running, else a private one-node cluster
    (installed with apt-get when missing), stopped again at the end of the session."""
    reason = install_slurm()
    if reason is not None:
        pytest.skip(f"no Slurm to test against: {reason}")
    cluster = SlurmCluster.reuse()
    if cluster is not None:
        yield cluster
        return
    if os.geteuid() != 0:
        pytest.skip("no Slurm cluster runs on this host, and starting one needs root")
    root = Path(tempfile.mkdtemp(prefix="attnres-slurm-"))
    cluster = SlurmCluster.start(root)
    try:
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)
