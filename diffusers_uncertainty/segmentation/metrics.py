"""Segmentation metrics from a `torchmetrics` confusion matrix: per-class IoU and Dice, mIoU, mean Dice and pixel
accuracy, with `ignore_index` pixels excluded.
"""

from typing import Dict, List, Optional, Sequence

import torch


class SegmentationMetrics:
    """Accumulates a confusion matrix (`torchmetrics.classification.MulticlassConfusionMatrix`) over batches.

    Per class c with true positives TP, false positives FP and false negatives FN:
    IoU = TP / (TP + FP + FN), Dice = 2 TP / (2 TP + FP + FN); a class absent from both truth and prediction has
    undefined (NaN) IoU / Dice and is left out of the means. Pixel accuracy = sum TP / number of labeled pixels.

    Args:
        num_classes (`int`): Number of classes.
        ignore_index (`int`): Label excluded from the metrics.
        class_names (`Sequence[str]`, *optional*): Class names for the reports.
    """

    def __init__(self, num_classes: int, ignore_index: int, class_names: Optional[Sequence[str]] = None):
        from torchmetrics.classification import MulticlassConfusionMatrix

        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"`class_names` must have {num_classes} entries, got {len(class_names)}.")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.class_names = list(class_names) if class_names is not None else [str(c) for c in range(num_classes)]
        self.confmat = MulticlassConfusionMatrix(num_classes=num_classes, ignore_index=ignore_index)

    def update(self, predictions: torch.Tensor, labels: torch.Tensor) -> None:
        """Adds a batch.

        Args:
            predictions (`torch.LongTensor` of shape `(batch, H, W)`): Predicted classes.
            labels (`torch.LongTensor` of shape `(batch, H, W)`): True classes or `ignore_index`.
        """
        if predictions.shape != labels.shape:
            raise ValueError(
                f"`predictions` {tuple(predictions.shape)} and `labels` {tuple(labels.shape)} must have the same shape."
            )
        if self.confmat.device != predictions.device:
            # The confusion matrix follows the predictions' device, so batches on the GPU need no host copy.
            self.confmat = self.confmat.to(predictions.device)
        self.confmat.update(predictions, labels.to(predictions.device))

    def compute(self) -> Dict:
        """Returns the metrics.

        Returns:
            `Dict`: `mIoU`, `mDice`, `pixel_accuracy`, `per_class` (list of `{class, IoU, Dice, pixels}`) and
            `labeled_pixels`. Undefined per-class values are `None`.
        """
        cm = self.confmat.compute().double()
        tp = cm.diag()
        fp = cm.sum(0) - tp
        fn = cm.sum(1) - tp
        union = tp + fp + fn
        iou = torch.where(union > 0, tp / union.clamp_min(1), torch.full_like(tp, float("nan")))
        dice = torch.where(union > 0, 2 * tp / (2 * tp + fp + fn).clamp_min(1), torch.full_like(tp, float("nan")))
        total = cm.sum()
        per_class: List[Dict] = []
        for c, name in enumerate(self.class_names):
            per_class.append(
                {
                    "class": name,
                    "IoU": None if torch.isnan(iou[c]) else float(iou[c]),
                    "Dice": None if torch.isnan(dice[c]) else float(dice[c]),
                    "pixels": int(cm[c].sum()),
                }
            )
        return {
            "mIoU": float(iou.nanmean()) if (union > 0).any() else None,
            "mDice": float(dice.nanmean()) if (union > 0).any() else None,
            "pixel_accuracy": float(tp.sum() / total) if total > 0 else None,
            "per_class": per_class,
            "labeled_pixels": int(total),
        }


def labeled_classes_mean_iou(metrics: Dict) -> Optional[float]:
    r"""
    Mean IoU over the classes that have pixels in the labels, from [`SegmentationMetrics.compute`]'s output.

    `mIoU` leaves out a class absent from both truth and prediction but counts a class absent from the truth as 0 when
    it is predicted anywhere, so two models can average different class sets on a split that lacks a class (CamVid's
    dusk target/val has no fence pixels). This mean is over the same classes for every model.

    Args:
        metrics (`dict`): With `per_class` entries holding `IoU` and `pixels`.

    Returns:
        `float` or `None`: `None` when the entries carry no pixel counts or no class has labeled pixels.
    """
    if any("pixels" not in entry for entry in metrics["per_class"]):
        return None
    labeled = [entry["IoU"] for entry in metrics["per_class"] if entry["pixels"] > 0]  # defined: union >= pixels
    return sum(labeled) / len(labeled) if labeled else None


def metrics_to_markdown(metrics: Dict, title: Optional[str] = None) -> str:
    """Formats [`SegmentationMetrics.compute`] output as a markdown table (values in percent).

    Args:
        metrics (`Dict`): Metrics.
        title (`str`, *optional*): Heading line.

    Returns:
        `str`
    """

    def pct(value):
        return "n/a" if value is None else f"{100 * value:.2f}"

    lines = [f"## {title}", ""] if title else []
    lines += [
        f"mIoU {pct(metrics['mIoU'])} | mean Dice {pct(metrics['mDice'])} | pixel accuracy "
        f"{pct(metrics['pixel_accuracy'])} ({metrics['labeled_pixels']} labeled pixels)",
        "",
        "| class | IoU | Dice | pixels |",
        "| --- | ---: | ---: | ---: |",
    ]
    for row in metrics["per_class"]:
        lines.append(f"| {row['class']} | {pct(row['IoU'])} | {pct(row['Dice'])} | {row['pixels']} |")
    return "\n".join(lines) + "\n"
