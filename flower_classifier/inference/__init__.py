"""Using a trained model: the Predictor, a whole photo archive into one resumable JSON-lines
file, and scoring a labelled folder."""
