"""clusterctl: Node's cluster module and PM2 for Python web apps, with systemd as the supervisor."""

__version__ = "0.1.0"
