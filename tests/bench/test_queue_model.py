"""benchmarks/online_queue_model.py against closed-form cases."""
import importlib.util
import os

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
spec = importlib.util.spec_from_file_location("online_queue_model",
                                              os.path.join(ROOT, "benchmarks", "online_queue_model.py"))
qm = importlib.util.module_from_spec(spec)
spec.loader.exec_module(qm)


def test_an_isolated_arrival_waits_host_step_host_api():
    # arrivals ~100 s apart, one token each: the engine is idle at every arrival
    t = qm.simulate(rate=0.01, num=20, output_len=1, dec0=4.0, dec_per=0.5, pre_per=10.0, host=1.0, api=3.0)
    assert np.allclose(t, 1.0 + (4.0 + 0.5 + 10.0) + 1.0 + 3.0)


def test_load_and_the_overlap_queue_add_waiting():
    low = qm.simulate(rate=2, num=300, seed=1).mean()
    high = qm.simulate(rate=32, num=300, seed=1).mean()
    off = qm.simulate(rate=32, num=300, seed=1, overlap=False).mean()
    assert low < off < high  # a step queued ahead (overlap) costs an arrival one more step
