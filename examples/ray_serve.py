"""N replicas of `granite-rs serve` behind Ray Serve: Ray starts one process per replica, each
with its own Generator (its own weights, KV cache pool and scheduler), and its HTTP proxy spreads
the requests over them. Each replica serves the same OpenAI-compatible routes as
`granite-rs serve` (granite_rs.server), so clients are unchanged.

    pip install 'granite-rs[serve,hub]' 'ray[serve]'
    GRANITE_MODEL=ibm-granite/granite-3.3-2b-instruct REPLICAS=2 THREADS=8 serve run examples.ray_serve:app

(checked with ray 2.60 and two replicas of the embedded SmolLM2 GGUF, one thread each: chat,
completions, streaming and concurrent clients) then, as against one server:

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
    client.chat.completions.create(model="granite", messages=[{"role": "user", "content": "Hi"}])

Give each replica whole physical cores (THREADS) and no more replicas than the cores allow: a
replica batches its own concurrent requests (continuous batching), so one replica per machine or
socket is usually best, and more replicas are for more machines. Requests of one conversation
reach its system prompt's cached blocks only on the replica that computed them; Ray's router does
not know about them, so a shared system prompt is computed once per replica.
"""

import os

from ray import serve

MODEL = os.environ.get("GRANITE_MODEL", "ibm-granite/granite-3.3-2b-instruct")
REPLICAS = int(os.environ.get("REPLICAS", "2"))
THREADS = int(os.environ.get("THREADS", "8"))


def build_app():
    """Runs in each replica's process: loads the model there, once."""
    from granite_rs import Generator
    from granite_rs.server import Server

    generator = Generator(MODEL, num_threads=THREADS, prefix_caching=True)
    return Server(generator, "granite", api_key=os.environ.get("GRANITE_RS_API_KEY")).app


GraniteServer = serve.deployment(
    serve.ingress(build_app)(),
    name="granite",
    num_replicas=REPLICAS,
    ray_actor_options={"num_cpus": THREADS},
    # Each replica batches up to this many requests itself; Ray queues the rest.
    max_ongoing_requests=64,
)
app = GraniteServer.bind()
