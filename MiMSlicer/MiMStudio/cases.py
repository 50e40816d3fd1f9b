"""The page's list of fine-tuning cases: (volume, segmentation) pairs of the scene, as the
Slicer module's "Add case" table holds them (``MiMLogicCore.start_finetune`` takes the
pairs). Slicer-free: a node is only asked for ``GetName()``; pairs are told apart by the
node objects themselves, so a renamed node is still the same case.
"""

from __future__ import annotations

from MiMSlicerLib.errors import MiMSlicerError


def cases_text(count: int) -> str:
    """What the page says under the list: which cases Fine-tune will train on."""
    if count <= 0:
        return "No case added: Fine-tune trains on the current volume and its segmentation."
    return f"{count} case{'s' if count != 1 else ''}: Fine-tune trains on {'these' if count != 1 else 'this one'}."


class CaseList:
    """(volume, segmentation) pairs, in the order they were added."""

    def __init__(self):
        self.pairs: list[tuple] = []

    def __len__(self) -> int:
        return len(self.pairs)

    def add(self, volume, segmentation) -> int:
        """Append a pair; its number (1-based). A segmentation already listed is refused."""
        if volume is None or segmentation is None:
            raise MiMSlicerError("Nothing to add: load a volume and segment it (or paint), then add it as a case.")
        for number, (_volume, listed) in enumerate(self.pairs, start=1):
            if listed is segmentation:
                raise MiMSlicerError(f"'{segmentation.GetName()}' is already case {number}: its edits are used "
                                     "as they are when Fine-tune starts.")
        self.pairs.append((volume, segmentation))
        return len(self.pairs)

    def remove(self, index) -> tuple:
        """Take out the pair at ``index`` (0-based, as the page sends it) and return it."""
        try:
            position = int(index)
        except (TypeError, ValueError):
            position = -1
        if not 0 <= position < len(self.pairs) or isinstance(index, bool):
            raise MiMSlicerError(f"There is no case {index!r} in the list.")
        return self.pairs.pop(position)

    def holds(self, node) -> bool:
        """True if ``node`` is the volume or the segmentation of a listed case."""
        return any(node is volume or node is segmentation for volume, segmentation in self.pairs)

    def rows(self) -> list[dict]:
        """The page's rows: ``{"index", "volume", "segmentation"}`` (names, as the scene has them now)."""
        return [{"index": i, "volume": volume.GetName(), "segmentation": segmentation.GetName()}
                for i, (volume, segmentation) in enumerate(self.pairs)]
