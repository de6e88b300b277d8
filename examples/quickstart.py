"""ladle quickstart: two composed deployments, answering from Python and over HTTP.

Run it with `python examples/quickstart.py` (Ctrl-C stops it), or serve the same
application with `ladle run quickstart:app --app-dir examples`.
"""

import json
import time
import urllib.request

from fastapi import FastAPI

from ladle import serve
from ladle.handle import DeploymentHandle

api = FastAPI()


@serve.deployment(num_replicas=2, max_ongoing_requests=16)
class Model:
    def __init__(self, scale: int):
        self.scale = scale

    def __call__(self, x: int) -> int:
        return x * self.scale

    async def predict(self, x: int) -> int:
        return x + self.scale


@serve.deployment
@serve.ingress(api)
class Pipeline:
    def __init__(self, model: DeploymentHandle):
        self.model = model

    @api.get("/predict")
    async def predict(self, x: int) -> dict:
        # Pass one call's response straight into the next: no waiting in between.
        scaled = self.model.remote(x)
        return {"input": x, "result": await self.model.predict.remote(scaled)}


app = Pipeline.bind(Model.bind(3))


def main() -> None:
    handle = serve.run(app, name="quickstart", route_prefix="/")
    print("from Python:", handle.predict.remote(2).result())
    with urllib.request.urlopen("http://127.0.0.1:8000/predict?x=2") as response:
        print("over HTTP:  ", json.load(response))
    print("\nServing on http://127.0.0.1:8000 (Ctrl-C to stop). Try:\n"
          "  curl 'http://127.0.0.1:8000/predict?x=5'", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()


if __name__ == "__main__":
    main()
