"""``python -m esb.server DIR``: the arbiter (the launcher runs it)."""

from esb.imports import defer_redis_asyncio

defer_redis_asyncio()  # before anything imports redis; the workers inherit it

from esb.server.application import main  # noqa: E402

if __name__ == "__main__":
    main()
