"""mwdlogd: a log server for Web-protection Engines, built on Trio."""

__version__ = "0.1.0"
