"""The demo services that `esb quickstart` deploys."""

from esb import Service


class Hello(Service):
    """Greets whoever the payload names."""

    name = "demo.hello"

    def handle(self):
        name = (
            self.request.payload.get("name", "world") if isinstance(self.request.payload, dict) else "world"
        )
        self.response.payload = {"hello": name}


class Echo(Service):
    """Answers with the payload it was given: the baseline for benchmarks."""

    name = "demo.echo"

    def handle(self):
        self.response.payload = self.request.payload
