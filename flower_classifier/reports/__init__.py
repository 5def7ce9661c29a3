"""What a person reads: the test report, plots and contact sheets, and the evaluation chain that
writes them for training and for predict.py --report."""
