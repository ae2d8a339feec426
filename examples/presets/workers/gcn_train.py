"""One-off worker for the gcn-train preset: a GCN (PyTorch Geometric) on Zachary's karate club.

The graph is torch_geometric's KarateClub, shipped inside the package (no download): 34 members
of a club, 78 friendships (156 directed edges), each member in one of 4 communities; one member
of each community is labelled (``train_mask``), and the GCN learns the other 30 from the
friendships alone (the features are one-hot identities). Kipf and Welling's two-layer GCN:
GCNConv -> ReLU -> dropout -> GCNConv, trained full-batch with Adam on the 4 labels.

Input (every field optional): {"epochs": 100, "hidden": 16, "learning_rate": 0.01,
"dropout": 0.5, "weight_decay": 0.0005, "seed": 0}.

Progress: one ``progress`` event per epoch, {"done", "total", "loss", "accuracy"} (accuracy
on the 30 members it was not told about).

Output: {"device", "graph": {"name", "nodes", "edges", "classes", "labelled"}, "epochs",
"loss", "train_accuracy", "accuracy", "predictions": [community of each member], "seconds"}.
Trains on ``cuda`` when the worker got a GPU (and CUDA is there: torch's ROCm build counts),
else the CPU, as the other training presets do.
"""

from __future__ import annotations

import time
from typing import Any

from gpulane.worker import Context, TaskError, serve

GRAPH = "karate_club"
"""The one graph the preset trains on (torch_geometric.datasets.KarateClub)."""

# field: (default, lowest, highest); an int default means the field is an integer
LIMITS: dict[str, tuple[float, float, float]] = {
    "epochs": (100, 1, 10_000),
    "hidden": (16, 1, 1024),
    "learning_rate": (0.01, 1e-6, 1.0),
    "dropout": (0.5, 0.0, 0.9),
    "weight_decay": (5e-4, 0.0, 1.0),
    "seed": (0, 0, 2**32 - 1),
}


def params_from(inp: Any) -> dict[str, Any]:
    """The input's fields with their defaults; TaskError("bad_input") naming a bad field."""
    if inp is None:
        inp = {}
    if not isinstance(inp, dict):
        raise TaskError("bad_input", f"input must be an object with any of {list(LIMITS)}")
    unknown = sorted(set(inp) - set(LIMITS))
    if unknown:
        raise TaskError("bad_input", f"unknown input field(s) {unknown}; known: {list(LIMITS)}")
    out: dict[str, Any] = {}
    for name, (default, low, high) in LIMITS.items():
        value = inp.get(name, default)
        whole = isinstance(default, int)
        if isinstance(value, bool) or not isinstance(value, int if whole else int | float) \
                or not low <= value <= high:
            kind = "an integer" if whole else "a number"
            raise TaskError("bad_input", f"input.{name} must be {kind} from {low:g} to "
                            f"{high:g}, got {value!r}")
        out[name] = value
    return out


def handle(inp: Any, ctx: Context) -> dict[str, Any]:
    p = params_from(inp)  # before importing torch_geometric (seconds): bad input fails at once
    import torch
    import torch.nn.functional as F
    from torch_geometric.datasets import KarateClub
    from torch_geometric.nn import GCNConv

    device = ctx.device if ctx.device.startswith("cuda") else "cpu"
    torch.manual_seed(p["seed"])
    data = KarateClub()[0].to(device)
    classes = int(data.y.max()) + 1
    test_mask = ~data.train_mask

    class GCN(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = GCNConv(data.num_node_features, p["hidden"])
            self.conv2 = GCNConv(p["hidden"], classes)

        def forward(self, x: Any, edge_index: Any) -> Any:
            h = F.relu(self.conv1(x, edge_index))
            h = F.dropout(h, p=p["dropout"], training=self.training)
            return self.conv2(h, edge_index)

    model = GCN().to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=p["learning_rate"],
                                 weight_decay=p["weight_decay"])

    def accuracy(mask: Any) -> tuple[float, Any]:
        model.eval()
        with torch.no_grad():
            predicted = model(data.x, data.edge_index).argmax(dim=1)
        right = int((predicted[mask] == data.y[mask]).sum())
        return right / int(mask.sum()), predicted

    epochs = p["epochs"]
    loss_value = float("nan")
    started = time.perf_counter()
    for epoch in range(1, epochs + 1):
        model.train()
        optimizer.zero_grad()
        out = model(data.x, data.edge_index)
        loss = F.cross_entropy(out[data.train_mask], data.y[data.train_mask])
        loss.backward()
        optimizer.step()
        loss_value = float(loss.detach())
        test_accuracy, _ = accuracy(test_mask)
        ctx.progress(done=epoch, total=epochs, loss=round(loss_value, 4),
                     accuracy=round(test_accuracy, 4),
                     message=f"epoch {epoch}/{epochs} loss {loss_value:.4f} "
                             f"accuracy {test_accuracy:.3f}")
    seconds = time.perf_counter() - started
    train_accuracy, _ = accuracy(data.train_mask)
    test_accuracy, predicted = accuracy(test_mask)
    return {"device": device,
            "graph": {"name": GRAPH, "nodes": data.num_nodes, "edges": data.num_edges,
                      "classes": classes, "labelled": int(data.train_mask.sum())},
            "epochs": epochs, "loss": round(loss_value, 4),
            "train_accuracy": round(train_accuracy, 4), "accuracy": round(test_accuracy, 4),
            "predictions": predicted.tolist(), "seconds": round(seconds, 3)}


if __name__ == "__main__":
    serve(handle=handle, batch=False)
