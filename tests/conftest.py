import os
import shutil

import pytest


def pytest_collection_modifyitems(config, items):
    """e2e tests need root (namespaces) and the Debian tools; say clearly why they are skipped otherwise."""
    missing = [tool for tool in ("ip", "ping", "iperf3") if shutil.which(tool) is None]
    reason = "needs root" if os.geteuid() != 0 else (f"missing tools: {', '.join(missing)}" if missing else "")
    no_etcd = (
        "etcd not installed (Debian etcd-server; scripts/setup.sh installs it)" if shutil.which("etcd") is None else ""
    )
    for item in items:
        path = str(item.fspath)
        if "/e2e/" in path:
            item.add_marker(pytest.mark.e2e)
            if reason:
                item.add_marker(pytest.mark.skip(reason=reason))
        if "/etcd/" in path or "etcd" in item.name:
            item.add_marker(pytest.mark.etcd)
            if no_etcd:
                item.add_marker(pytest.mark.skip(reason=no_etcd))
