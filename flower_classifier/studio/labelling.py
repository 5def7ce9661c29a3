"""The new photos worth labelling, in the studio (studio.py --unlabelled FOLDER): the latest
run's head scores their cached features (no backbone pass), inference.suggest's rule keeps the
least sure that are not near-copies of one another, and they come in batches of one predicted
class, so that a person confirms a batch at once and relabels the few that are wrong. A label
adds the photo to train/ through corrections.json; the next retrain learns from it and the next
suggestions come from that run.

    batches = suggested_batches(studio, classifier, decided=set())
    # [{"predicted": class index, "ids": [photo ids], "probabilities": [...]}, ...]
"""
import torch

from flower_classifier.inference.suggest import (
    MAX_SIMILARITY,
    POOL_FACTOR,
    certainties,
    diverse,
    grouped,
)
from flower_classifier.studio.state import NEW

SUGGESTED = 100  # photos suggested at once: about a round of benchmarks/active_learning.py's
BATCH = 20  # photos of one predicted class confirmed at once
BLOCK = 4096  # rows scored at a time: memory stays flat in the number of new photos


@torch.inference_mode()
def suggested_batches(studio, classifier, decided, count=SUGGESTED, batch=BATCH):
    """Up to count undecided, readable new photos, least sure first, without near-copies,
    grouped by predicted class in batches of at most `batch`."""
    features = studio.features[NEW][0]
    photos = [studio.photos[photo_id] for photo_id in studio.readable_new()
              if photo_id not in decided]
    if not photos:
        return []
    rows = torch.tensor([photo.row for photo in photos])
    device = next(classifier.head.parameters()).device
    probabilities = torch.cat([classifier.head(features[block].float().to(device)).softmax(1)
                               .cpu() for block in rows.split(BLOCK)])
    scores = certainties(probabilities)
    pool = [(scores[index].item(), index, photos[index].id, probabilities[index],
             torch.nn.functional.normalize(features[rows[index]].float(), dim=0))
            for index in scores.argsort(stable=True)[:count * POOL_FACTOR].tolist()]
    chosen = grouped(diverse(pool, count, MAX_SIMILARITY), lambda entry: int(entry[3].argmax()))
    batches = []
    for entry in chosen:
        predicted = int(entry[3].argmax())
        if not batches or batches[-1]["predicted"] != predicted or len(
                batches[-1]["ids"]) == batch:
            batches.append({"predicted": predicted, "ids": [], "probabilities": []})
        batches[-1]["ids"].append(entry[2])
        batches[-1]["probabilities"].append(round(entry[3][predicted].item(), 4))
    return batches
