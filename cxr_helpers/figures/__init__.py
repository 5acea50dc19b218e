"""Figures: the plots every stage draws, and their colours and labels."""
