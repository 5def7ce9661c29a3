"""The data check: what in a photo folder would mislead training or inflate the test score.

Exact duplicates (same bytes) within a class, across classes and across splits (leaks);
near-copies (re-saved, resized, slightly cropped, burst shots): nearest neighbours by the
backbone features training computes anyway (so on a warm feature cache the check costs no
backbone pass), confirmed by tiny greyscale thumbnails; unreadable and tiny images; class counts
and the imbalance ratio; and photos likely filed under the wrong class: the confident-learning
rule on out-of-fold predictions of a ridge classifier on the same features. It never moves or
deletes a file: it writes data_report.json and one contact sheet per finding, and
cleaning.cleaned_manifest() turns the findings into a split manifest without them.

    features = split_features(extractor, splits, eval_transform(backbone.preprocess))
    report = check_dataset(class_to_idx, splits, features, save_dir, cache_dir)
    print("\\n".join(summary_lines(report, save_dir)))

facts.py reads the files (digests, sizes, thumbnails), findings.py finds what is wrong,
report.py runs the whole check and writes the report, cleaning.py drops what it found.
"""
