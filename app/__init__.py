"""The Streamlit app (app/main.py: `streamlit run app/main.py`) and its engine (app/generation.py)."""
