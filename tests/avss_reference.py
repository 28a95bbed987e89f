"""Oracles for the AVSBench-semantic tests: transcriptions of the reference's code
(OpenNLPLab/AVSBench, avs_scripts/avss/), each naming its source file. Test use only: the
package computes these things with its own code (models/tpavi.py, models/avsmodel.py, losses.py)."""
import torch
import torch.nn as nn
import torch.nn.functional as F


class RefTPAVIModule(torch.nn.Module):
    """Oracle: a transcription of AVSBench's AVSS TPAVIModule ('dot' mode, dimension 3, with BN)
    from OpenNLPLab/AVSBench avs_scripts/avss/model/TPAVI.py. Same parameter names as ours, so
    our state dict loads into it."""

    def __init__(self, in_channels):
        super().__init__()
        self.in_channels = in_channels
        self.inter_channels = in_channels // 2
        self.align_channel = nn.Linear(128, in_channels, bias=False)
        self.norm_layer = nn.LayerNorm(in_channels)
        self.g = nn.Conv3d(self.in_channels, self.inter_channels, kernel_size=1)
        self.W_z = nn.Sequential(nn.Conv3d(self.inter_channels, self.in_channels, kernel_size=1),
                                 nn.BatchNorm3d(self.in_channels))
        self.theta = nn.Conv3d(self.in_channels, self.inter_channels, kernel_size=1)
        self.phi = nn.Conv3d(self.in_channels, self.inter_channels, kernel_size=1)

    def forward(self, x, audio):
        batch_size = x.size(0)
        H, W = x.shape[-2], x.shape[-1]
        audio_temp = self.align_channel(audio)
        audio = audio_temp.permute(0, 2, 1)
        audio = audio.unsqueeze(-1).unsqueeze(-1)
        audio = audio.repeat(1, 1, 1, H, W)
        g_x = self.g(x).view(batch_size, self.inter_channels, -1)
        g_x = g_x.permute(0, 2, 1)
        theta_x = self.theta(x).view(batch_size, self.inter_channels, -1)
        phi_x = self.phi(audio).view(batch_size, self.inter_channels, -1)
        theta_x = theta_x.permute(0, 2, 1)
        f = torch.matmul(theta_x, phi_x)
        N = f.size(-1)
        f_div_C = f / N
        y = torch.matmul(f_div_C, g_x)
        y = y.permute(0, 2, 1).contiguous()
        y = y.view(batch_size, self.inter_channels, *x.size()[2:])
        W_y = self.W_z(y)
        z = W_y + x
        z = z.permute(0, 2, 3, 4, 1)
        z = self.norm_layer(z)
        z = z.permute(0, 4, 1, 2, 3)
        return z, audio_temp


def ref_tpavi_va(block, x, audio):
    """Oracle: Pred_endecoder.tpavi_va with pre/post_reshape_for_tpavi (avs_scripts/avss/model/
    PVT_AVSModel.py): x [B*T, C, H, W], audio [B*T, 128] -> groups of 5 frames."""
    audio = audio.view(-1, 5, audio.shape[-1])
    _, C, H, W = x.shape
    x = x.reshape(-1, 5, C, H, W).permute(0, 2, 1, 3, 4).contiguous()
    x, a = block(x, audio)
    x = x.permute(0, 2, 1, 3, 4)
    x = x.reshape(-1, C, H, W)  # the reference's .view, on a permuted tensor: reshape is the same values
    return x, a


def _ref_rcu(unit, x):
    """ResidualConvUnit.forward (avs_scripts/avss/model/PVT_AVSModel.py), with our unit's convs:
    its ReLU is in place, so x itself (a map the caller keeps) becomes relu(x)."""
    out = torch.relu_(x)
    out = unit.conv1(out)
    out = torch.relu_(out)
    out = unit.conv2(out)
    return out + x


def _ref_fusion(block, *xs):
    """FeatureFusionBlock.forward (same file)."""
    output = xs[0]
    if len(xs) == 2:
        output += _ref_rcu(block.resConfUnit1, xs[1])
    output = _ref_rcu(block.resConfUnit2, output)
    return F.interpolate(output, scale_factor=2, mode="bilinear", align_corners=True)


def ref_pred_endecoder(avs, ref_blocks: dict, x, audio_feature, vid_temporal_mask_flag):
    """Pred_endecoder.forward (avs_scripts/avss/model/PVT_AVSModel.py and ResNet_AVSModel.py,
    the same after the encoder), tpavi_va_flag only, with our AVSModel's encoder, ASPP heads,
    fusion blocks and output head, and `ref_blocks[stage]` (RefTPAVIModule) as its TPAVI:
    x [B*T, 3, H, W], audio_feature [B*T, 128], flag [B*T] -> (pred, feature_map_list, a_fea_list)."""
    x1, x2, x3, x4 = avs.encoder(x)
    conv1_feat = avs.conv1(x1)
    conv2_feat = avs.conv2(x2)
    conv3_feat = avs.conv3(x3)
    conv4_feat = avs.conv4(x4)
    vid_temporal_mask_flag = vid_temporal_mask_flag.view(-1, 1, 1, 1)
    conv1_feat = conv1_feat * vid_temporal_mask_flag
    conv2_feat = conv2_feat * vid_temporal_mask_flag
    conv3_feat = conv3_feat * vid_temporal_mask_flag
    conv4_feat = conv4_feat * vid_temporal_mask_flag
    feature_map_list = [conv1_feat, conv2_feat, conv3_feat, conv4_feat]
    a_fea_list = [None] * 4
    for i in sorted(ref_blocks):
        tpavi_count = 0
        conv_feat = torch.zeros_like(feature_map_list[i])
        conv_feat_va, a_fea = ref_tpavi_va(ref_blocks[i], feature_map_list[i], audio_feature)
        conv_feat_va = conv_feat_va * vid_temporal_mask_flag
        conv_feat += conv_feat_va
        tpavi_count += 1
        a_fea_list[i] = a_fea
        conv_feat /= tpavi_count
        feature_map_list[i] = conv_feat
    conv4_feat = _ref_fusion(avs.path4, feature_map_list[3])
    conv4_feat = conv4_feat * vid_temporal_mask_flag
    conv43 = _ref_fusion(avs.path3, conv4_feat, feature_map_list[2])
    conv43 = conv43 * vid_temporal_mask_flag
    conv432 = _ref_fusion(avs.path2, conv43, feature_map_list[1])
    conv432 = conv432 * vid_temporal_mask_flag
    conv4321 = _ref_fusion(avs.path1, conv432, feature_map_list[0])
    conv4321 = conv4321 * vid_temporal_mask_flag
    pred = avs.output_conv(conv4321)
    pred = pred * vid_temporal_mask_flag
    return pred, feature_map_list, a_fea_list


def F10_IoU_BCELoss(pred_mask, ten_gt_masks, gt_temporal_mask_flag):
    """avs_scripts/avss/loss.py F10_IoU_BCELoss: pred [B*10, K, H, W], masks [B*10, H, W], flag [B*10]."""
    assert len(pred_mask.shape) == 4
    if ten_gt_masks.shape[1] == 1:
        ten_gt_masks = ten_gt_masks.squeeze(1)
    loss = nn.CrossEntropyLoss(reduction='none')(pred_mask, ten_gt_masks)
    loss = loss.mean(-1).mean(-1)
    loss = loss * gt_temporal_mask_flag
    loss = torch.sum(loss) / torch.sum(gt_temporal_mask_flag)
    return loss


def A_MaskedV_SimmLoss(pred_masks, a_fea_list, v_map_list, gt_temporal_mask_flag, count_stages=(),
                       mask_pooling_type='avg', norm_fea=True, threshold=False, euclidean_flag=False,
                       kl_flag=False, bg_idx=None):
    """avs_scripts/avss/loss.py A_MaskedV_SimmLoss. `bg_idx` None is the reference's own
    (pred_masks.shape[1] - 1); any other value is our correction's (background = 0), the only change."""
    assert len(pred_masks.shape) == 4
    if bg_idx is None:
        bg_idx = (pred_masks.shape[1] - 1)
    pred_masks = torch.softmax(pred_masks, dim=1)
    pred_masks = torch.argmax(pred_masks, dim=1).unsqueeze(1)
    pred_masks = (pred_masks != bg_idx).float()
    total_loss = 0
    for stage in count_stages:
        a_fea, v_map = a_fea_list[stage], v_map_list[stage]
        a_fea = a_fea.view(-1, a_fea.shape[-1])
        C, H, W = v_map.shape[1], v_map.shape[-2], v_map.shape[-1]
        assert C == a_fea.shape[-1], 'Error: dimensions of audio and visual features are not equal'
        if mask_pooling_type == "avg":
            downsample_pred_masks = nn.AdaptiveAvgPool2d((H, W))(pred_masks)
        elif mask_pooling_type == 'max':
            downsample_pred_masks = nn.AdaptiveMaxPool2d((H, W))(pred_masks)
        if threshold:
            downsample_pred_masks = (downsample_pred_masks > 0.5).float()
            obj_pixel_num = downsample_pred_masks.sum(-1).sum(-1)
            masked_v_map = torch.mul(v_map, downsample_pred_masks)
            masked_v_fea = masked_v_map.sum(-1).sum(-1) / (obj_pixel_num + 1e-6)
        else:
            masked_v_map = torch.mul(v_map, downsample_pred_masks)
            masked_v_fea = masked_v_map.mean(-1).mean(-1)
        if norm_fea:
            a_fea = F.normalize(a_fea, dim=-1)
            masked_v_fea = F.normalize(masked_v_fea, dim=-1)
        if euclidean_flag:
            euclidean_distance = F.pairwise_distance(a_fea, masked_v_fea, p=2)
            loss = euclidean_distance * gt_temporal_mask_flag
            loss = torch.sum(loss) / torch.sum(gt_temporal_mask_flag)
        elif kl_flag:
            loss = F.kl_div(masked_v_fea.softmax(dim=-1).log(), a_fea.softmax(dim=-1), reduction='none')
            loss = loss.sum(-1)
            loss = loss * gt_temporal_mask_flag
            loss = torch.sum(loss) / torch.sum(gt_temporal_mask_flag)
        total_loss += loss
    total_loss /= len(count_stages)
    return total_loss
