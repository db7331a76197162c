#!/bin/bash
# CPU exploration: LoRA on the SD fixture at 4 steps, batch 32, conv+attention rank 64 against the default
cd /work/main
common="--pretrained_model_name_or_path assets/fmnist-t2i-sd --prompts_file examples/prompts/fmnist_t2i.txt --guidance_scale 5
 --nfe 4 --rounds 1 --phase1_iters 0 --phase2_steps 600 --train_batch_size 32 --pool_size 2048 --pool_batch_size 256
 --use_ema --learning_rate 1e-4 --phase2_target endpoint --reference_scheduler pipeline --eval_samples 256 --eval_steps 150
 --checkpointing_steps 100000 --pool_cache_dir /tmp/cpu_t2i/pools --no-compare_reference"
for v in conv64 attn16; do
  case $v in
    conv64) extra="--lora_rank 64 --lora_layers conv1,conv2,time_emb_proj,to_q,to_k,to_v,to_out.0" ;;
    attn16) extra="--lora_rank 16" ;;
  esac
  s=$(date +%s)
  python3 scripts/train_fewstep.py $common $extra --output_dir /tmp/cpu_t2i/$v > /tmp/cpu_t2i/$v.log 2>&1
  echo "$v rc=$? $(( $(date +%s) - s )) s" >> /tmp/cpu_t2i/done.txt
done
