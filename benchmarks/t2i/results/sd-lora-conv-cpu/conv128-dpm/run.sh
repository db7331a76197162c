#!/bin/bash
# CPU probe: the 4-step convolution LoRA tuned for DPM-Solver++(2M) steps at rank 128 against rank 64
# (conv64-dpm: lr 1e-4, latent RMSE .0956 at step 150, .0811 at 300), same pool (cached), 300 steps
cd /work/main
s=$(date +%s)
python3 scripts/train_fewstep.py --pretrained_model_name_or_path assets/fmnist-t2i-sd --prompts_file examples/prompts/fmnist_t2i.txt --guidance_scale 5 \
 --nfe 4 --rounds 1 --phase1_iters 0 --phase2_steps 300 --train_batch_size 32 --pool_size 2048 --pool_batch_size 256 \
 --use_ema --learning_rate 1e-4 --phase2_target endpoint --reference_scheduler pipeline --eval_samples 256 --eval_steps 150 \
 --checkpointing_steps 100000 --pool_cache_dir /tmp/cpu_t2i/pools --no-compare_reference \
 --lora_rank 128 --lora_layers conv1,conv2,time_emb_proj,to_q,to_k,to_v,to_out.0 --solver dpmpp_2m \
 --output_dir /tmp/cpu_t2i4/conv128-dpm > /tmp/cpu_t2i4/conv128-dpm.log 2>&1
echo "conv128-dpm rc=$? $(( $(date +%s) - s )) s" >> /tmp/cpu_t2i4/done.txt
