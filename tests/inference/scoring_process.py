"""One process of test_scoring's two-process job: a tiny model's parameters replicated on a mesh of
4 CPU devices over 2 processes; process 0 scores the requests (broadcasting each batch) and prints
the answers as JSON, process 1 serves the batches and prints how many it ran. Then process 0 fails
(a request with no answer tokens) and says so: process 1 must raise, not wait.

    python scoring_process.py PORT PROCESS_ID REQUESTS_JSON
"""

import json
import os
import sys

import jax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from decoding_models import tiny_model  # noqa: E402
from tinyllama_jax import sharding  # noqa: E402
from tinyllama_jax.inference import scoring  # noqa: E402


def main(port, process_id, requests_path):
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=int(process_id))
  params, cfg_model = tiny_model(0)
  mesh_cfg = {"data": 1, "fsdp": 4, "tensor": 1}
  mesh = sharding.make_mesh(mesh_cfg)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  params = jax.tree.map(lambda x: jax.make_array_from_callback(x.shape, replicated,
                                                               lambda i: x[i]), params)
  with jax.set_mesh(mesh):
    scorer = scoring.Scorer(params, cfg_model, batch_size=3, mesh=mesh)
    if jax.process_index() == 0:
      with open(requests_path) as f:
        requests = json.load(f)
      answers = scorer.loglikelihoods(requests)
      scorer.stop_serving()
      print("ANSWERS " + json.dumps(answers), flush=True)
      try:
        scorer.loglikelihoods([([1, 2], [])])
      except ValueError as e:
        scorer.stop_serving(failed=True)
        print(f"FAILED {e}", flush=True)
    else:
      print(f"SERVED {scorer.serve()}", flush=True)
      try:
        scorer.serve()
      except ValueError as e:
        print(f"SERVING FAILED {e}", flush=True)


if __name__ == "__main__":
  main(*sys.argv[1:])
