"""ladle quickstart: two deployments composed, called from Python.

Run it with `python examples/quickstart.py`.
"""

from ladle import serve
from ladle.handle import DeploymentHandle


@serve.deployment(num_replicas=2, max_ongoing_requests=16)
class Model:
    def __init__(self, scale: int):
        self.scale = scale

    def __call__(self, x: int) -> int:
        return x * self.scale

    async def predict(self, x: int) -> int:
        return x + self.scale


@serve.deployment
class Pipeline:
    def __init__(self, model: DeploymentHandle):
        self.model = model

    async def __call__(self, x: int) -> dict:
        # Pass one call's response straight into the next: no waiting in between.
        doubled = self.model.remote(x)
        return {"input": x, "result": await self.model.predict.remote(doubled)}


def main() -> None:
    handle = serve.run(Pipeline.bind(Model.bind(3)), name="quickstart", route_prefix="/")
    print("Python:", handle.remote(2).result())
    for item in [handle.remote(i) for i in range(5)]:
        print("  ", item.result())
    serve.shutdown()


if __name__ == "__main__":
    main()
