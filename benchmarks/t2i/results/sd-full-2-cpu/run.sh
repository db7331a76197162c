#!/bin/bash
# CPU capacity probe: full tuning of the SD fixture UNet at 2 steps, the conv64-2 settings otherwise
cd /work/main
s=$(date +%s)
python3 scripts/train_fewstep.py --pretrained_model_name_or_path assets/fmnist-t2i-sd --prompts_file examples/prompts/fmnist_t2i.txt \
 --guidance_scale 5 --nfe 2 --rounds 1 --phase1_iters 0 --phase2_steps 600 --train_batch_size 32 --pool_size 2048 --pool_batch_size 256 \
 --use_ema --phase2_target endpoint --reference_scheduler pipeline --eval_samples 256 --eval_steps 150 \
 --checkpointing_steps 100000 --pool_cache_dir /tmp/cpu_t2i/pools --no-compare_reference \
 --no-use_lora --output_dir /tmp/cpu_t2i2/full-2 > /tmp/cpu_t2i2/full-2.log 2>&1
echo "full-2 rc=$? $(( $(date +%s) - s )) s" >> /tmp/cpu_t2i2/done.txt
s=$(date +%s)
python3 benchmarks/t2i/evaluate_t2i.py --pipeline assets/fmnist-t2i-sd --scheduler-folder /tmp/cpu_t2i2/full-2 \
 --classifier ../shared/fixtures/fmnist-classifier --data /usr/share/datasets/fashion-mnist --n 2000 --guidance 5 --nfes 2 --rows dpmpp_2m \
 --grid-nfe 2 --device cpu --out /tmp/cpu_t2i2/eval > /tmp/cpu_t2i2/eval.log 2>&1
echo "eval rc=$? $(( $(date +%s) - s )) s" >> /tmp/cpu_t2i2/done.txt
