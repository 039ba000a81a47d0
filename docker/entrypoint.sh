#!/bin/sh
# Quickstart /srv/esb on first start, then run it in the foreground: the launcher becomes
# PID 1, reaps its children, and stops arbiter, workers and scheduler on `docker stop`'s SIGTERM.
#
# ESB_QUICKSTART_ARGS adds quickstart options, e.g. "--redis redis://redis:6379/0
# --odb postgresql+psycopg://esb:esb@postgres/esb --workers 2". Any server.conf key can
# also be overridden at run time as ESB_<SECTION>_<KEY> (ESB_MAIN_WORKERS=4, ...).
set -eu
DIR=${ESB_DIR:-/srv/esb}
if [ ! -f "$DIR/server.conf" ]; then
    # shellcheck disable=SC2086 # word splitting of the options is intended
    esb quickstart "$DIR" --host 0.0.0.0 --port 17010 ${ESB_QUICKSTART_ARGS:-}
fi
exec esb start "$DIR" --fg
