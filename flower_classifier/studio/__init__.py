"""The studio (studio.py): a local web app over a photo folder, its data check, decisions kept in
corrections.json, and a quick retrain of the head."""
