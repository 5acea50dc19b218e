"""Running the suite: the notebooks through papermill, and Kaggle build and push."""
