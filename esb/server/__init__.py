"""The server: gunicorn arbiter, gevent workers, their runtime and HTTP app."""
