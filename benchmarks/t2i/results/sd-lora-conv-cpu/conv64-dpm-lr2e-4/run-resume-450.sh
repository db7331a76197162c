#!/bin/bash
# CPU probe: the 4-step convolution LoRA tuned for DPM-Solver++(2M) steps at lr 2e-4 against 1e-4 (the run of
# /tmp/cpu_t2i/run_dpm.sh, stopped after step 379), same pool (cached), 300 steps
cd /work/main
s=$(date +%s)
python3 scripts/train_fewstep.py --pretrained_model_name_or_path assets/fmnist-t2i-sd --prompts_file examples/prompts/fmnist_t2i.txt --guidance_scale 5 \
 --nfe 4 --rounds 1 --phase1_iters 0 --phase2_steps 450 --train_batch_size 32 --pool_size 2048 --pool_batch_size 256 \
 --use_ema --learning_rate 2e-4 --phase2_target endpoint --reference_scheduler pipeline --eval_samples 256 --eval_steps 150 \
 --checkpointing_steps 100000 --pool_cache_dir /tmp/cpu_t2i/pools --no-compare_reference \
 --lora_rank 64 --lora_layers conv1,conv2,time_emb_proj,to_q,to_k,to_v,to_out.0 --solver dpmpp_2m \
 --output_dir /tmp/cpu_t2i3/conv64-dpm-lr2e-4 --resume_from_checkpoint latest > /tmp/cpu_t2i3/conv64-dpm-lr2e-4-450.log 2>&1
echo "lr2e-4-450 rc=$? $(( $(date +%s) - s )) s" >> /tmp/cpu_t2i3/done.txt
