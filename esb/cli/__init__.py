"""The command line: `esb quickstart|start|stop|status|deploy|invoke|check-config`."""
