"""Real-time recommendations: variable-length INT64 item histories in, the top-k item ids
and scores out, from a torch EmbeddingBag two-tower scorer built here, served by a real
replica behind the gateway and called with tritonclient.http."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
import tritonclient.http as triton
from torch import nn

from tests.gateway_helpers import BEARER, StandaloneGateway
from tests.replica_models import ReplicaProcess, save_torchscript
from tests.steps_helpers import gateway_for, start_with_steps

pytestmark = pytest.mark.slow
ITEMS, DIM, TOP_K = 1000, 64, 5
PADDING = 0  # item 0 pads short histories in a batch; it is never recommended
SIGNATURE = {
    "inputs": [{"name": "history", "datatype": "INT64", "shape": [-1, -1]}],
    "outputs": [{"name": "item_ids", "datatype": "INT64", "shape": [-1, TOP_K]},
                {"name": "scores", "datatype": "FP32", "shape": [-1, TOP_K]}],
}


class TwoTower(nn.Module):
    """history INT64 [-1, L] -> the top-k items (ids [-1, k], scores [-1, k]).

    The user tower is the mean of the history's item embeddings (an EmbeddingBag that
    skips padding); the item tower shares those embeddings, normalised, so an item is
    its own best match: a one-item history recommends that item first.
    """

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        weight = nn.functional.normalize(torch.randn(ITEMS, DIM), dim=1)
        weight[PADDING] = 0.0
        self.user = nn.EmbeddingBag.from_pretrained(weight, mode="mean",
                                                    padding_idx=PADDING)
        self.register_buffer("items", weight.clone())
        self.padding, self.top_k = PADDING, TOP_K  # attributes: TorchScript reads no globals

    def forward(self, history: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = self.user(history) @ self.items.T  # [B, ITEMS]
        scores[:, self.padding] = float("-inf")
        top = torch.topk(scores, self.top_k, dim=1)
        return top.indices, top.values


def expected(history: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    with torch.inference_mode():
        ids, scores = TwoTower()(torch.from_numpy(history))
    return ids.numpy(), scores.numpy()


def assert_top_k(history: np.ndarray, ids: np.ndarray, scores: np.ndarray) -> None:
    """Check the answer against the model run here; items whose scores tie (a two-item
    history scores both alike) may come in either order, batched or not."""
    model = TwoTower()
    with torch.inference_mode():
        every = (model.user(torch.from_numpy(history)) @ model.items.T).numpy()
    want_scores = expected(history)[1]
    np.testing.assert_allclose(scores, want_scores, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.take_along_axis(every, ids, axis=1), scores,
                               rtol=1e-5, atol=1e-6)
    assert len(set(ids.ravel().tolist())) == ids.size


@pytest.fixture(scope="module")
def replica(tmp_path_factory) -> Iterator[tuple[ReplicaProcess, StandaloneGateway]]:
    directory = tmp_path_factory.mktemp("recommend")
    artifact = save_torchscript(TwoTower().eval(), directory / "two-tower.pt")
    process = start_with_steps(directory, artifact, SIGNATURE, None, name="recommend",
                               max_batch_size=16)
    try:
        with gateway_for(directory, process) as gateway:
            yield process, gateway
    finally:
        process.stop()


@pytest.fixture
def gateway(replica) -> StandaloneGateway:
    return replica[1]


def recommend(port: int, history: np.ndarray, binary: bool) -> tuple[np.ndarray, np.ndarray]:
    """Return (item ids, scores) for histories [N, L] through the gateway."""
    with triton.InferenceServerClient(url=f"127.0.0.1:{port}") as client:
        ids_input = triton.InferInput("history", list(history.shape), "INT64")
        ids_input.set_data_from_numpy(history, binary_data=binary)
        outputs = [triton.InferRequestedOutput(name, binary_data=binary)
                   for name in ("item_ids", "scores")]
        result = client.infer("recommend", [ids_input], outputs=outputs, headers=dict(BEARER))
        return result.as_numpy("item_ids"), result.as_numpy("scores")


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
@pytest.mark.parametrize("length", [1, 3, 17])
def test_histories_of_any_length_get_the_top_k(gateway, binary, length):
    history = np.arange(10, 10 + length, dtype=np.int64)[np.newaxis, :]
    ids, scores = recommend(gateway.port, history, binary)
    assert ids.dtype == np.int64 and ids.shape == (1, TOP_K)
    assert_top_k(history, ids, scores)
    assert (np.diff(scores[0]) <= 0).all()  # best first
    if length == 1:
        assert ids[0, 0] == 10 and scores[0, 0] == pytest.approx(1.0, abs=1e-5)


def test_padding_makes_a_batch_of_unequal_histories_answer_as_singles(gateway):
    histories = [[42], [7, 8, 9], [500, 501]]
    padded = np.zeros((3, 3), dtype=np.int64)
    for row, history in enumerate(histories):
        padded[row, :len(history)] = history
    ids, scores = recommend(gateway.port, padded, True)
    for row, history in enumerate(histories):
        _, single_scores = recommend(gateway.port, np.array([history]), True)
        np.testing.assert_allclose(scores[row], single_scores[0], rtol=1e-5, atol=1e-6)
        assert_top_k(np.array([history]), ids[row:row + 1], scores[row:row + 1])
    assert PADDING not in ids


def test_concurrent_requests_of_mixed_lengths_each_get_their_own_answer(replica, gateway):
    process, _ = replica
    rng = np.random.default_rng(3)
    histories = [rng.integers(1, ITEMS, size=(1, int(rng.integers(1, 6)))) for _ in range(40)]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda h: recommend(gateway.port, h, True), histories))
    for history, (ids, scores) in zip(histories, answers, strict=True):
        assert_top_k(history, ids, scores)
    with process.client() as client:
        stats = client.get("/stats").json()
    assert stats["completed"] >= len(histories)
