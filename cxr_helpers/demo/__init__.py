"""The offline demo: synthetic films in the Kaggle layout, the tiny SD-shaped model and its pretraining."""
