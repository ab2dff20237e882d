"""Compiles the real train step for a TPU topology on this (CPU) host and prints its memory.

  pip install -e ".[tpu]"
  JAX_PLATFORMS=cpu python tools/aot_compile.py --config configs/meki_1p7b.py --topology v5p-64 \
      [--config.train.grad_accum_steps=8 ...]

Prints the attention implementation compiled ('auto' is the splash kernel on TPU), where MeKi's
memory is mixed (model.memory_mix: per token or per vocabulary row), the remat
policy, what lives in host memory (model.remat_offload, optim.params_on_host,
optim.opt_state_on_host) and accumulation, per-device arguments (parameters + optimizer state +
batch), temporaries, the total against the chip's HBM, the host memory the program uses, and
TFLOPs per step: the model's (the analytic formula of meki_jax/train/flops.py) and the
program's matmuls, recomputation included, every loop multiplied out
(meki_jax/train/program_flops.py; XLA's cost analysis counts the scanned layer once).
Runs beside other processes that hold libtpu (an AOT compile opens no chip).
"""

from meki_jax import cli

cli.start(__name__)  # before jax is imported: Ctrl-C is one line from here on

import json  # noqa: E402
import os  # noqa: E402

os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')  # before anything loads libtpu
os.environ.setdefault('JAX_PLATFORMS', 'cpu')  # compile for the topology, not a local chip

from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from meki_jax.train.aot import compile_train_step, parse_topology  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file('config', None, 'A config file (configs/*.py[:arg]).',
                                          lock_config=True)
_TOPOLOGY = flags.DEFINE_string('topology', 'v5p-64', 'Accelerator type: v5p-8 ... v5p-1024, '
                                'v5e-N, v6e-N, v4-N.')
_JSON = flags.DEFINE_bool('json', False, 'Print one JSON object.')


def main(argv):
  del argv
  result = compile_train_step(_CONFIG.value, parse_topology(_TOPOLOGY.value))
  if _JSON.value:
    print(json.dumps(result))
    return
  setting = (f"attention {result['attention']}, remat {result['remat_policy']}, grad accum "
             f"{result['grad_accum_steps']}")
  if result['memory_mix']:
    per = {'tokens': 'token', 'vocabulary': 'vocabulary row'}[result['memory_mix']]
    setting += f', MeKi memory mixed per {per}'
  on_host = result['state_on_host'] + tuple(f'activation {name}'
                                            for name in result['remat_offload'])
  if on_host:
    setting += f", in host memory: {', '.join(on_host)}"
  if 'error' in result:
    print(f"{result['topology']} ({result['chips']} chips), {setting}: DOES NOT FIT: "
          f"{result['error']}")
    return
  host = (f"; host memory {result['host_total_gib']:.2f} GiB (arguments "
          f"{result['host_argument_gib']:.2f}, temporaries {result['host_temporary_gib']:.2f})"
          if result['host_total_gib'] else '')
  print(f"{result['topology']} ({result['chips']} chips), {setting}, per device: "
        f"arguments {result['argument_gib']:.2f} GiB, temporaries {result['temporary_gib']:.2f} "
        f"GiB, total {result['total_gib']:.2f} of {result['hbm_gib']} GiB HBM -> "
        f"{'fits' if result['fits'] else 'DOES NOT FIT'}{host}; TFLOPs per step: model "
        f"{result['model_tflops_per_step']:.1f}, program {result['program_tflops_per_step']:.1f}")


if __name__ == '__main__':
  flags.mark_flag_as_required('config')
  cli.run_absl(main)
