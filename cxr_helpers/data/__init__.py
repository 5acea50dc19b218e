"""The data: reading the Kaggle dataset and pairs.csv, the prepare stage, report labels, prompts, the resized-image cache, the dataset."""
